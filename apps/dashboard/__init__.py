"The dashboard's entry (app.py) and pages (generated; see ../__init__.py)."
