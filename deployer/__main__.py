"""``python -m deployer``: the deployer service (see ``deployer.service``)."""

from deployer.service import main
from shipline.bootstrap import run

if __name__ == "__main__":
    run("deployer", main)
