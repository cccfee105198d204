"""`python -m cornpipe ...` is the `cornpipe` command."""

from cornpipe.cli import main

if __name__ == "__main__":
    main()
