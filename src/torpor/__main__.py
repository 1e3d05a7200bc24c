"""``python -m torpor``."""

from torpor._cli import main

raise SystemExit(main())
