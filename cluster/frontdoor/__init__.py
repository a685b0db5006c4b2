"""The fleet's front door: HAProxy on the fleet's HTTP port, routing inference in one hop.

- ``routes``: the routes (from the router) and the HAProxy configuration, pure;
- ``haproxy``: the HAProxy process, reloaded through its master CLI;
- ``actor``: ``FrontDoorActor``, which owns that process beside the controller.
"""
