import sys
from hvr_agent.main import main
sys.exit(main())
