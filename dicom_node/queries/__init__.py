"""What the node recorded, read back for people: studies with their series, jobs, outputs
and exports; the audit trail's filters. The REST API, the dashboard and the command line
all call these functions (a ``Session`` in, pydantic models out), so each question is
asked of the database in one place.

- ``paging``: ``Paging`` (limit, offset) and ``Page`` (the items and the total);
- ``studies``: ``search_studies``, ``study_detail``, ``series_detail``;
- ``jobs``: ``search_jobs``, ``job_view``;
- ``exports``: ``search_exports``, ``export_view``;
- ``since``: ``parse_since`` (``30m``, ``7d``, an ISO 8601 time).
"""
