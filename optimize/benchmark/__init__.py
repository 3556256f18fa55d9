"""Stage ``benchmark``: ``report.run`` measures every artifact against the baseline (``measure``), draws the
conclusions (``gates``), folds in rows measured on devices (``device_rows``) and writes the report (``render``)."""
