"""``python -m meter`` runs the ``meter`` command line."""

from meter.cli import run

if __name__ == "__main__":
    run()
