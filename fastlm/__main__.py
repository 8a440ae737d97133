import sys

from fastlm.cli import main

sys.exit(main())
