"""Jobs: their states (``state``), the dispatcher that makes and runs them, the executors
they run on, and what a worker does for one (``worker``)."""
