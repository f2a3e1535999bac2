from tasklease.cli import main

raise SystemExit(main())
