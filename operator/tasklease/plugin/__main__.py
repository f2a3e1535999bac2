from tasklease.plugin.cli import main

raise SystemExit(main())
