import sys

from resnet_fused.validate import main

sys.exit(main())
