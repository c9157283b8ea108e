"""`python -m service` == `adaptserve`."""
import sys

from service.cli import main

sys.exit(main())
