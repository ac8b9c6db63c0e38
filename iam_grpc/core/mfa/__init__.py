"""Completing MFA (behaviour.md 3.4, 4.2-4.6, 5.4): codes, magic links, resends, step-up grants.

A challenge is completed by its code (:mod:`.codes`) or its link (:mod:`.magic_links`) on the
device that raised it, and only then does anyone receive a Session: a link opened on another
device only *approves* the challenge (4.5), and the original device collects its Session by
repeating its Login or Refresh. Wrong codes spend attempts in the same atomic step that reads
them, so replicas cannot grant more than ``mfa.max_attempts`` tries between them.

Success changes what the service trusts (:mod:`.completion`): the device becomes trusted with a
new baseline and learns its network, country and location; a refresh challenge rotates the token
it was raised for (and moves the session to the completing device for NEW_DEVICE); a login
challenge opens the session; a step-up challenge (:mod:`.step_up`) yields a short-lived
single-use grant bound to the session and action.
"""
