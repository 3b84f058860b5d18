from distdpo.cli import main

raise SystemExit(main())
