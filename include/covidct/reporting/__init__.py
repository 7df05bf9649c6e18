"""The comparison report: backbones side by side, with intervals, figures and a gallery of maps."""
