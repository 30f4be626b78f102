"""main.py: not implemented yet (see the open issues)."""
import sys

if __name__ == '__main__':
    sys.exit("error: main.py is not implemented yet; see the project's open issues")
