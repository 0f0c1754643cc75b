"""TangoFlux (declare-lab) text-to-audio daemon: `engine.TangoFluxEngine`; see README.md."""
