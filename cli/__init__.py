"""The meshnode command line (typer). The only place that turns typed errors into messages and
exit codes; everything below it raises."""
