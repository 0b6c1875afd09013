"""janus-hooks benchmark harness: ``bench/run`` measures each row against its baseline in the same run."""
