"""dalle_gen.py: not implemented yet (see the open issues)."""
import sys

if __name__ == '__main__':
    sys.exit("error: dalle_gen.py is not implemented yet; see the project's open issues")
