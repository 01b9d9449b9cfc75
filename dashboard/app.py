"""`streamlit run dashboard/app.py -- --storage URL` from a checkout: runs the installed app, `tuner/dashboard/app.py`.

`dart-tuner dashboard --storage URL` serves the same app from any install, a built wheel included.
"""

import runpy

runpy.run_module("tuner.dashboard.app", run_name="__main__")
