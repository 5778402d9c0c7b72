"""The XML-RPC API: OpenNebula method names, argument order and reply convention.

Each handler module registers the methods of one kind of object on ``registry``; ``methods`` imports
them all. Handlers take ``(ctx, caller, *args)``; they read objects from ``ctx.state`` and change them
only inside ``ctx.state.mutation()``.
"""
