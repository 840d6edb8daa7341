"""``python -m outbound``: the dispatcher service."""

from outbound.dispatcher import main
from shipline.bootstrap import run

if __name__ == "__main__":
    run("dispatcher", main)
