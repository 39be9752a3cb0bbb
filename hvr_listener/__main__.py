import sys
from hvr_listener.main import main
sys.exit(main())
