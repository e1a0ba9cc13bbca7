"""The driver: `train` picks the loop (run.py); what both loops share (common.py); the sync loop (sync.py);
the async driver (async_driver.py); Ctrl-C and fatal failures (interrupt.py)."""
