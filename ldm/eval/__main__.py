from ldm.eval.cli import main

raise SystemExit(main())
