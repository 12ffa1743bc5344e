from dnsmirror.cli import main

raise SystemExit(main())
