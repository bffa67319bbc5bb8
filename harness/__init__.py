"""kvbench harness: model loading, the attention hook, cache surgery, the run loop and the report.

The harness never imports a concrete method or task module by name: it reaches them through the
``methods`` and ``tasks`` registries.
"""
