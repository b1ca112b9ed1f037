"""A Django project of realistic weight for reload tests and the benchmark: Django with its contrib apps, Django
REST framework, django-celery-beat, and four apps of the project's own, each with models, serializers and
tasks. Three values a task returns, each from a different kind of file a developer saves: a task module
(`catalog/tasks.py`), a model (`orders/models.py`: a field's max_length) and the settings (`SITE_VALUE`).

`write_site(root, url)` writes it; `save_task(root, n)`, `save_model(root, n)` and `save_settings(root, n)`
save a new value; the tasks are `catalog.tasks.value`, `orders.tasks.status_length` and
`accounts.tasks.setting`."""

from __future__ import annotations

import textwrap
from pathlib import Path

PKG = "site_pkg"  # the Django project's package (settings, the Celery app)
APPS = ("accounts", "catalog", "orders", "reports")

_SETTINGS = """
    from pathlib import Path

    BASE_DIR = Path(__file__).resolve().parent.parent
    SECRET_KEY = "test-only"
    DEBUG = True
    USE_TZ = True
    INSTALLED_APPS = [
        "django.contrib.admin",
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django.contrib.staticfiles",
        "rest_framework",
        "django_celery_beat",
        {apps},
    ]
    DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}}}
    ROOT_URLCONF = "{pkg}.urls"
    DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
    REST_FRAMEWORK = {{"DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination"}}
    CELERY_BROKER_URL = "{url}"
    CELERY_RESULT_BACKEND = "{url}"
    CELERY_TASK_ROUTES = {{"reports.tasks.*": {{"queue": "reports"}}}}
    SITE_VALUE = {value}
"""

_CELERY = """
    import os

    from celery import Celery

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{pkg}.settings")
    app = Celery("{pkg}")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.autodiscover_tasks()
"""

_URLS = """
    from django.contrib import admin
    from django.urls import include, path
    from rest_framework import routers

    router = routers.DefaultRouter()
    urlpatterns = [path("admin/", admin.site.urls), path("api/", include(router.urls))]
"""

_MODELS = """
    from django.conf import settings
    from django.db import models


    class {title}Group(models.Model):
        name = models.CharField(max_length=100, unique=True)
        created = models.DateTimeField(auto_now_add=True)

        class Meta:
            ordering = ["name"]


    class {title}Item(models.Model):
        group = models.ForeignKey({title}Group, on_delete=models.CASCADE, related_name="items")
        owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
        title = models.CharField(max_length=200)
        status = models.CharField(max_length={length}, default="new")
        amount = models.DecimalField(max_digits=12, decimal_places=2, default=0)
        data = models.JSONField(default=dict)
        updated = models.DateTimeField(auto_now=True)

        class Meta:
            indexes = [models.Index(fields=["status", "updated"])]
"""

_SERIALIZERS = """
    from rest_framework import serializers

    from .models import {title}Group, {title}Item


    class {title}ItemSerializer(serializers.ModelSerializer):
        class Meta:
            model = {title}Item
            fields = "__all__"


    class {title}GroupSerializer(serializers.ModelSerializer):
        items = {title}ItemSerializer(many=True, read_only=True)

        class Meta:
            model = {title}Group
            fields = ["id", "name", "created", "items"]
"""

_TASKS = """
    from celery import shared_task
    from django.conf import settings

    from .models import {title}Item
    from .serializers import {title}ItemSerializer

    VALUE = {value}


    @shared_task
    def value():
        return VALUE


    @shared_task
    def status_length():
        return {title}Item._meta.get_field("status").max_length


    @shared_task
    def setting():
        return settings.SITE_VALUE


    @shared_task
    def fields():
        return sorted({title}ItemSerializer().fields)
"""

_APPS_PY = """
    from django.apps import AppConfig


    class {title}Config(AppConfig):
        name = "{app}"
"""


def _write(path: Path, text: str, **values: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip().format(**values))


def write_site(root: Path, url: str) -> None:
    apps = ", ".join(f'"{a}"' for a in APPS)
    _write(root / PKG / "settings.py", _SETTINGS, apps=apps, pkg=PKG, url=url, value=1)
    _write(root / PKG / "__init__.py", "from .celery import app as celery_app\n\n__all__ = ('celery_app',)\n")
    _write(root / PKG / "celery.py", _CELERY, pkg=PKG)
    _write(root / PKG / "urls.py", _URLS)
    _write(
        root / "manage.py",
        """
        import os
        import sys

        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{pkg}.settings")
            from django.core.management import execute_from_command_line

            execute_from_command_line(sys.argv)
        """,
        pkg=PKG,
    )
    for app in APPS:
        title = app.capitalize()
        _write(root / app / "__init__.py", "")
        _write(root / app / "apps.py", _APPS_PY, app=app, title=title)
        _write(root / app / "models.py", _MODELS, title=title, length=20)
        _write(root / app / "serializers.py", _SERIALIZERS, title=title)
        _write(root / app / "tasks.py", _TASKS, title=title, value=1)
        _write(root / app / "admin.py", "from django.contrib import admin\n\nfrom . import models  # noqa: F401\n")


def save_task(root: Path, n: int) -> None:
    _write(root / "catalog" / "tasks.py", _TASKS, title="Catalog", value=n)


def save_model(root: Path, n: int) -> None:
    _write(root / "orders" / "models.py", _MODELS, title="Orders", length=n)


def save_settings(root: Path, n: int) -> None:
    apps = ", ".join(f'"{a}"' for a in APPS)
    _write(root / PKG / "settings.py", _SETTINGS, apps=apps, pkg=PKG, url=_url(root), value=n)


def _url(root: Path) -> str:
    for line in (root / PKG / "settings.py").read_text().splitlines():
        if line.startswith("CELERY_BROKER_URL = "):
            return line.split('"')[1]
    raise ValueError("no broker URL in the settings")
