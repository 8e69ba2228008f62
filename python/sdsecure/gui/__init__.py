"""The streamlit GUI's logic, kept out of the script so it can be tested without a browser.

    validation.py   validate a model through the shared gate; the report as table rows; gating rules
    generation.py   generation parameters, checks, and the PNG bytes (with provenance) to serve
    query.py        query parameters (?model=embedded&validate=1) that drive the app on load

`python/stable-diffusion.py` is only layout: widgets in, these functions, widgets out.
"""

# Load pyarrow before MAX: with MAX 26.7's runtime already loaded, pyarrow's first to_pandas()
# (every streamlit table) segfaults; loaded first, both work (seen here with pyarrow 26.0.1).
import pyarrow  # noqa: E402,F401
