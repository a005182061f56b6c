"""The served model: promote (the champion alias), serve, and the pyfunc model itself."""
