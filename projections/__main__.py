"""``python -m projections``: run the live projector until SIGTERM/SIGINT."""

from projections.projector import main
from shipline.bootstrap import run

if __name__ == "__main__":
    run("projector", main)
