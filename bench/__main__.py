"""``python -m bench``: the SQL operations benchmark (see :mod:`bench.sql_ops`)."""

from bench.sql_ops import main

if __name__ == "__main__":
    raise SystemExit(main())
