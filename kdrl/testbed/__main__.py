"""``python -m kdrl.testbed``: say so before the slow imports, then run :func:`kdrl.testbed.experiment.main`."""
import signal
import sys

print("[kdrl.testbed +0.0s] starting: importing torch and transformers ...", flush=True)
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C during the imports: no traceback

from kdrl.testbed.experiment import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on main() catches KeyboardInterrupt
sys.exit(main())
