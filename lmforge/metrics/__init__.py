"""FLOPs and MFU, the metrics log, run information and reports."""
