"""``python tests/cifar_md5_main.py ARGS``: the CLI (``python -m mllmfl_dist ARGS``) with torchvision's CIFAR
MD5 table pointed at the generated files named by $MLLMFL_TEST_CIFAR_MD5 (tests/paper_data.py), so torchrun's
worker processes read the generated CIFAR pickles through the project's unchanged loader."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's mllmfl_dist, as -m finds it
sys.path.insert(1, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    from paper_data import MD5_ENV, patch_cifar_md5

    if os.environ.get(MD5_ENV):
        patch_cifar_md5(json.loads(Path(os.environ[MD5_ENV]).read_text()))
    from mllmfl_dist.__main__ import main

    sys.exit(main(sys.argv[1:]))
