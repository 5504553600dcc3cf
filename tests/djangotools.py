"""Django as the tests set it up: in this process (settings are process-wide, configured
once as Django allows), and the small project of the scripts that run Django's own test
clients in a process of their own, bare and under hopscope's bootstrap.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["DJANGO_CLIENT_PROJECT", "django_urls"]


@contextlib.contextmanager
def django_urls(module: str, urlpatterns: list[Any], **overrides: Any) -> Iterator[None]:
    """Django serving ``urlpatterns`` from a URL module of its own (named ``module``) for
    the block.  Another test module may have configured the settings first: the minimum
    is configured if nobody has, then ``ROOT_URLCONF``, ``ALLOWED_HOSTS ["*"]``,
    ``MIDDLEWARE []`` and ``overrides`` are overridden for the block only."""
    import django
    from django.conf import settings
    from django.test.utils import override_settings

    urls = types.ModuleType(module)
    urls.urlpatterns = urlpatterns  # type: ignore[attr-defined]
    sys.modules[module] = urls
    try:
        if not settings.configured:
            settings.configure(SECRET_KEY="test", USE_TZ=True, INSTALLED_APPS=[])
            django.setup()
        with override_settings(
            ROOT_URLCONF=module, ALLOWED_HOSTS=["*"], MIDDLEWARE=[], **overrides
        ):
            yield
    finally:
        del sys.modules[module]


#: The project of a script that runs one of Django's test clients: views ``hello``
#: (echoes the body, sets a cookie) and ``boom`` (raises), with the script's own
#: ``stream`` view (defined before this text), routed, and Django set up.  The script
#: imports ``django``, ``settings``, ``HttpResponse`` and ``path`` first.
DJANGO_CLIENT_PROJECT = """

def hello(request, name):
    response = HttpResponse(b"hello " + request.body, content_type="text/plain")
    response.set_cookie("seen", "yes")
    return response


def boom(request):
    raise ValueError("boom")


urlpatterns = [path("hello/<name>", hello), path("stream", stream), path("boom", boom)]
settings.configure(
    SECRET_KEY="test", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], MIDDLEWARE=[]
)
django.setup()
"""
