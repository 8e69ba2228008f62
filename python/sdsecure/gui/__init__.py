"""The streamlit GUI's logic, kept out of the script so it can be tested without a browser.

    validation.py   validate a model through the shared gate; the report as table rows; gating rules
    generation.py   generation parameters, checks, and the PNG bytes (with provenance) to serve
    query.py        query parameters (?model=embedded&validate=1) that drive the app on load

`python/stable-diffusion.py` is only layout: widgets in, these functions, widgets out.
"""
