import sys
from hvrctl.main import main
sys.exit(main())
