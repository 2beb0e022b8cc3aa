"""Push providers behind one small protocol; built in the app's lifespan."""
