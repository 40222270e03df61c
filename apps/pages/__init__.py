"The dashboard's pages (generated; see ../__init__.py)."
