from deepminer.cli import main

raise SystemExit(main())
