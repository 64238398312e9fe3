"""The dashboard at ``/``: server-rendered pages (Jinja2) with a little JavaScript and CSS
served by the node itself (``static/``), no CDN and no build step. Signing in with an API
token sets a cookie that the pages and the REST API accept (``dicom_node.api.auth``);
buttons change things through the REST API, so its role checks and audit rows apply."""
