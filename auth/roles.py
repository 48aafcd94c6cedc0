"""The roles a token can carry.

A token names exactly one role; the broker and the site agents decide what each role may do
(policy lives with them, not here). The values are the strings written into the `role` claim,
so renaming a member is a breaking change for every token already issued.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    RESEARCHER = "researcher"  # submits nnsight requests
    SITE_ADMIN = "site_admin"  # operates one site (its models, its policy)
    GOVERNANCE = "governance"  # reads audit trails and approves access
    ADMIN = "admin"  # operates the whole mesh
    SITE = "site"  # a site agent's own identity towards the broker
    BROKER = "broker"  # the broker's identity towards site agents
