"""Servicers: decode the request, call one core function, encode the reply.

RPCs whose behaviour is not built yet answer UNIMPLEMENTED with an ErrorInfo
(reason ``UNIMPLEMENTED``) through the normal error mapping.
"""
