"""kvbench harness: model loading, the attention hook, cache surgery, the run loop and the report.

The harness never imports a concrete method or task module by name: it reaches them through the
``methods`` and ``tasks`` registries.

Layers: imports point down only (``tests/test_layers.py`` checks every import of harness/, methods/ and tasks/,
those inside functions included).

1. **Core**: every module of harness/ that ``COMMAND_MODULES`` does not name. The method contract and what it
   runs on: the compression protocol and budget arithmetic (``compress``), the learner contract and registry
   (``learning``), the attention hook (``attention``), cache surgery (``cache``), prefill / greedy decoding
   (``pipeline``), model loading and identity (``models``, ``tokenizer``, ``compat``), the profile file format
   (``profiles``), the config schema and its composition (``schema``, ``overrides``) and the plumbing
   (``errors``, ``io``, ``paths``, ``lock``, ``fingerprint``, ``metrics``). Core imports neither ``methods`` nor
   ``tasks`` nor a command module.
2. **methods/ and tasks/**: import the core and their own package, never a command module (a method that
   needs something of a command moves that into the core, as LU-KV's profile format did).
3. **Commands** (``COMMAND_MODULES``): the programs and what only they use: ``kvbench`` (``cli``, ``runner``,
   ``summary``), ``kvbench-report`` (``report``, ``figures``, ``depth_figures``, ``footprint_figures``, ``published``),
   ``kvbench-reproduce`` (``reproduce``), ``kvbench-profile`` (``profile``), ``kvbench-train`` (``train``) and
   ``kvbench-train-reference`` (the ``reference`` package). They may import anything below them.
"""

COMMAND_MODULES = ("harness.cli", "harness.runner", "harness.summary", "harness.report", "harness.figures",
                   "harness.depth_figures", "harness.footprint_figures", "harness.published", "harness.reproduce", "harness.profile", "harness.train", "harness.reference")
