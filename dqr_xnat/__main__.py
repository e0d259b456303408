from dqr_xnat.cli.main import main

raise SystemExit(main())
