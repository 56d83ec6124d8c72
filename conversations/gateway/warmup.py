"""Work a gateway process does once at start-up so that no request pays for it.

The token encoder's tables take about 0.3 s to load (several times that on a
busy machine); loaded lazily, the first request of each worker waited for them.

The garbage collector is the other cost. A worker starts with over a million
objects (Django, the models, the encoder, the provider client); CPython's full
collections walked all of them, and under load at c=200 one such collection
stopped the event loop for about 200 ms, and with it every request in flight
(measured with gc.callbacks in the benchmark). gc.freeze() moves everything that
exists after start-up into a permanent generation that collections skip, so
they walk only the objects of requests in flight. A larger youngest generation
means fewer young collections, so fewer objects of requests still waiting for
the provider are promoted into the older generations that cost the most to walk.
"""

import gc

from django.conf import settings

from conversations.gateway.tokens import encoder_for


def prepare_process() -> None:
    encoder_for("cl100k_base")
    threshold = settings.GATEWAY["GC_THRESHOLD"]
    if threshold:
        gc.set_threshold(*threshold)
    gc.collect()
    gc.freeze()
