"""Full cache: nothing is evicted (``scorer: null`` in conf/method/full.yaml); the reference every method is
compared with. No code is needed: a method without a scorer never compresses."""
