"""The ground floor: config schema and validation, metric names, the calibration maths, file I/O,
errors and process helpers. Imports nothing else of the package."""
