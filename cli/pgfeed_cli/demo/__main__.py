"""``python -m pgfeed_cli.demo writer|reader``: a demo child process."""

import sys

from pgfeed_cli.demo.child import child_main

sys.exit(child_main(sys.argv[1:]))
