"""pretrain_DAMSM.py: not implemented yet (see the open issues)."""
import sys

if __name__ == '__main__':
    sys.exit("error: pretrain_DAMSM.py is not implemented yet; see the project's open issues")
