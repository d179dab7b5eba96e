"""``python -m duet_vlm.cli`` (``accelerate launch -m duet_vlm.cli train ...``): the console script."""

from . import main

main()
